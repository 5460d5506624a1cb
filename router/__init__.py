"""kvstore: router package (see DESIGN.md)."""
