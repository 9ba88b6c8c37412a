"""The inspection service around the engine: capture, worker, publisher, recorder, supervisor."""
