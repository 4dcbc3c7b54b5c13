"""The public status model: the one snapshot, its findings, and what the faces need to show them."""
