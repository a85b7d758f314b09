"""Inter-process transport: shared-memory ring buffers, the message format, the cancellation bitmap."""
