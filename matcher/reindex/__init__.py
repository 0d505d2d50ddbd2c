"""The overnight re-index: booking manifest in, templates in the store, a snapshot out."""
