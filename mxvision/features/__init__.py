"""Images to CNN codes: extraction into a sharded feature store, streaming, reduced precision."""
