"""The Stable Diffusion model as iSeg uses it: loading a local folder (loader), the
attention layers the method reads (layers), capturing their probabilities
(attention_capture), and the CLIP vocabulary the tiny test model needs (clip_vocab)."""
