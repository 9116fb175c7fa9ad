"""etk: entity-tracking toolkit for studying how fine-tuning changes model mechanisms."""

__version__ = "0.1.0"
