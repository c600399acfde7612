"""Data cards written from run records, and publishing."""

from .builder import Card, CardError, build_card
from .publish import publish_dir, publish_hub, write_card

__all__ = ["Card", "CardError", "build_card", "publish_dir", "publish_hub", "write_card"]
