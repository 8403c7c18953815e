"""Small helpers used by more than one part of ftlab."""
