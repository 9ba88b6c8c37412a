"""Around the engine, not part of the method: the `iseg` engine subcommands (cli), the
benchmark (bench), mIoU evaluation (evaluate), the tiny and full-size random-weight test
models (tiny_model, full_size), image files (image_io), overlays (overlay) and the
bundled sample images (samples)."""
