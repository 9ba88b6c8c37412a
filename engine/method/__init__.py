"""The steps of iSeg, in the order a frame meets them (docs/method.md explains each).

preprocess (frame → tensor) · prompt (prompt text, class-token spans) · text_cache
(Cat-Cross embedding, cached) · cross_maps (token maps from cross-attention) ·
clustering (KL k-means) · ent_self (entropy-reduced self-attention) · refine (iterations)
· masks (maps and label mask) · presence (is a class there at all) · interactive (point,
box and scribble prompts).
"""
