"""BAGEL (UniCorn's base model) behind the model protocol."""
