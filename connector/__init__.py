"""kvstore: connector package (see DESIGN.md)."""
