"""A tiny, seeded Stable Diffusion with the real SD 1.5 / 2.1 topology, for tests and demos.

The real weights are gigabytes and may not be downloaded here, yet the engine has to
be exercised end to end: model loading, the exact attention layers of docs/method.md §2,
head selection, the real CLIP tokenizer. This module builds a diffusers-format folder
(10–30 MB) whose UNet has every layer iSeg reads, with tiny widths.

Random weights give near-uniform attention with a few "hub" pixels that every query
attends to, on which downstream tests would pass (or fail) for the wrong reasons. So
the weights that shape attention are *calibrated* on a fixed synthetic image with four
flat-coloured regions, noised at t=100 like docs/method.md §1:
- the VAE encoder becomes a smooth colour pooler with whitened latents (regions of one
  colour share a latent, and region contrast is not drowned by the t=100 noise);
- in one UNet forward with pre-hooks (execution order, so each layer sees the effect
  of the earlier ones), every transformer's proj_in keeps the top principal directions
  of its input, which makes self-attention a cosine kernel (no hubs), and every
  attention layer's q/k projections are set from its own input: self-attention on that
  subspace, cross-attention sending each token to a random direction of the image's
  principal subspace (different tokens peak in different regions). Each layer's gain is
  bisected to a target mean normalised attention entropy.
Values, outputs, feed-forwards, the decoder and the text encoder stay random.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from engine.method.prompt import build_prompt
from engine.model.clip_vocab import VOCAB_SIZE, locate_vocab, write_clip_tokenizer
from engine.model.layers import GROUP_DOWNSCALE, READ_LAYERS
from engine.results import ClassSet

IMAGE_SIZE = 512
SD_SCALING = 0.18215
LATENT_SIZE = 64
NOISE_SEED = 1101
TIMESTEP = 100
SELF_TARGET_ENTROPY = 0.45
CROSS_TARGET_ENTROPY = 0.5
HEAD_SPREAD = 0.05
SAMPLE_ROWS = 256
SAMPLE_CLASSES = ("red square", "blue disk")
SELF_LAYER = next(layer.name for layer in READ_LAYERS if layer.group == "self")
CROSS_LAYERS = {LATENT_SIZE // GROUP_DOWNSCALE[group]: [layer.name for layer in READ_LAYERS if layer.group == group]
                for group in ("coarse", "mid")}
"""Cross-attention layers the method reads, by query-grid side (16: 0.7 weight, 32: 0.3)."""


@dataclass(frozen=True)
class Family:
    """Widths of one tiny model family; topology and naming follow the real SD family."""

    block_out_channels: tuple[int, int, int, int]
    heads: int | tuple[int, int, int, int]
    use_linear_projection: bool
    text_width: int
    text_act: str


FAMILIES = {
    # SD 1.5: 8 heads everywhere (diffusers calls it attention_head_dim=8), conv projections.
    "sd15": Family((64, 64, 64, 64), 8, False, 32, "quick_gelu"),
    # SD 2.1: [5, 10, 20, 20]-style head counts with 5 heads at 64×64, linear projections.
    "sd21": Family((40, 40, 40, 80), (5, 5, 5, 10), True, 48, "gelu"),
}


def sample_prompt(classes: tuple[str, ...] = SAMPLE_CLASSES) -> str:
    """The iSeg prompt (docs/method.md §1.4) for the calibration classes, with the default background context."""
    return build_prompt(ClassSet(classes))


def calibration_image() -> tuple[np.ndarray, np.ndarray]:
    """A fixed 512×512 RGB uint8 image with four regions, and its 64×64 region labels.

    Background (0, grey vertical gradient), red square (1), blue disk (2), green band (3).
    Deterministic so that calibration, tests and metrics all see the same frame.
    """
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    labels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int64)
    labels[(xx > 60) & (xx < 230) & (yy > 70) & (yy < 240)] = 1
    labels[(xx - 350) ** 2 + (yy - 170) ** 2 < 95 ** 2] = 2
    labels[(yy > 360) & (yy < 450) & (xx > 40)] = 3
    colours = np.array([[0, 0, 0], [200, 40, 30], [30, 60, 200], [40, 170, 60]], np.float32)
    rgb = colours[labels]
    grey = 110 + 60 * yy / IMAGE_SIZE
    rgb[labels == 0] = grey[labels == 0][:, None]
    small = labels[4::8, 4::8]
    return np.clip(rgb, 0, 255).astype(np.uint8), small


def _text_config(family: Family, pad_id: int) -> CLIPTextConfig:
    width = family.text_width
    return CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act=family.text_act, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=pad_id)


def _unet(family: Family) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=family.block_out_channels, layers_per_block=2,
        attention_head_dim=family.heads, cross_attention_dim=family.text_width,
        use_linear_projection=family.use_linear_projection, norm_num_groups=8,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
    )


def _colour_encoder(vae: AutoencoderKL) -> None:
    """Turn the random encoder into a smooth colour pooler, so regions of one colour share a latent.

    A random conv encoder answers mostly to edges: flat regions of different colours
    end up closer than the two sides of one edge. Zeroing every residual branch (and
    the mid-block attention output) leaves a chain of 1×1 colour mixes, 3×3 box-filter
    downsamplers, a GroupNorm and a SiLU: a per-pixel nonlinear function of the
    locally averaged colour. The decoder stays random; iSeg never decodes.
    """
    enc = vae.encoder
    for module in enc.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        elif isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
    for conv in (enc.conv_in, enc.conv_out):
        centre = conv.weight[:, :, 1, 1].clone()
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = centre * 3
    for block in enc.down_blocks:
        for down in block.downsamplers or []:
            channels = down.conv.weight.shape[0]
            down.conv.weight.zero_()
            down.conv.weight[range(channels), range(channels)] = 1 / 9
            down.conv.bias.zero_()


def _whiten_latents(vae: AutoencoderKL, rgb: np.ndarray) -> torch.Tensor:
    """Centre and whiten the latent mean on `rgb` (via quant_conv) and set scaling_factor for unit std.

    The raw latents get SD's typical spread (std 1/0.18215), so the scaling_factor comes
    out near SD's and an engine that forgets to apply it fails visibly. Whitening gives
    the region contrast the whole latent variance, so the t=100 noise does not drown it.
    Returns the raw (unscaled) latent mean of `rgb`.
    """
    mean = vae.encode(_image_tensor(rgb)).latent_dist.mean[0].flatten(1)
    centre = mean.mean(1)
    evals, evecs = torch.linalg.eigh(torch.cov(mean))
    whiten = evecs @ torch.diag(evals.clamp_min(evals.max() * 1e-4).rsqrt() / SD_SCALING) @ evecs.T
    quant = vae.quant_conv
    channels = mean.shape[0]
    weight = quant.weight[:channels, :, 0, 0]
    quant.weight[:channels, :, 0, 0] = whiten @ weight
    quant.bias[:channels] = whiten @ (quant.bias[:channels] - centre)
    raw = vae.encode(_image_tensor(rgb)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    return raw


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _image_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).mul(2).sub(1)


def _mean_entropy(logits: torch.Tensor) -> float:
    """Mean row entropy of softmax(logits) over rows and heads, divided by log(#keys)."""
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return float(ent.mean() / math.log(logits.shape[-1]))


def _principal_coords(x: torch.Tensor, rank: int) -> torch.Tensor:
    """[rank, C] map to whitened principal coordinates of x [N, C], blind to x's mean direction.

    Used for cross-attention queries and keys: removing the mean direction means no
    token gets a constant bonus at every pixel, and whitening lets the few principal
    directions that separate regions count as much as the dominant one.
    """
    mean = x.mean(0)
    unit = mean / mean.norm().clamp_min(1e-8)
    centred = x - mean
    centred = centred - centred @ unit[:, None] * unit[None, :]
    evals, evecs = torch.linalg.eigh(centred.T @ centred / x.shape[0])
    order = torch.argsort(evals, descending=True)[:rank]
    scale = evals[order].clamp_min(evals[order][0] * 1e-4).rsqrt()
    return scale[:, None] * evecs[:, order].T


def _head_gains(heads: int) -> torch.Tensor:
    """Slightly different sharpness per head, so head selection (e.g. [1, 2]) is meaningful."""
    return torch.logspace(-HEAD_SPREAD, HEAD_SPREAD, heads)


def _fit_gain(logits: torch.Tensor, target: float) -> float:
    """Gain g whose softmax(g·logits) has mean normalised entropy `target` (entropy falls as g rises)."""
    lo, hi = math.log(1e-2), math.log(1e4)
    for _ in range(16):
        mid = (lo + hi) / 2
        if _mean_entropy(logits * math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _hub_ratio(probs: torch.Tensor) -> float:
    """Max over keys of the mean attention a key receives, × #keys (1 = perfectly even)."""
    return float(probs.mean(0).mean(0).max() * probs.shape[-1])


def _calibrate_self(attn: Attention, x: torch.Tensor, gen: torch.Generator) -> None:
    """q = k = orthonormal basis of the subspace the input lies in (see _calibrate_proj_in), × gain.

    Inputs there all have one norm, so the logits are a cosine kernel; the gain is set
    by entropy bisection on the middle head (heads differ only by a gain factor).
    """
    heads = attn.heads
    dim = attn.to_q.out_features // heads
    evals, evecs = torch.linalg.eigh(x.T @ x / x.shape[0])
    basis = evecs[:, torch.argsort(evals, descending=True)[:dim]].T
    weight = (basis[None] * _head_gains(heads)[:, None, None]).reshape(heads * dim, -1)
    mid = weight[heads // 2 * dim:(heads // 2 + 1) * dim]
    rows = torch.randperm(x.shape[0], generator=gen)[:SAMPLE_ROWS]
    gain = _fit_gain((x[rows] @ mid.T) @ (x @ mid.T).T * attn.scale, SELF_TARGET_ENTROPY)
    attn.to_q.weight.copy_(weight * math.sqrt(gain))
    attn.to_k.weight.copy_(weight * math.sqrt(gain))


def _calibrate_cross(attn: Attention, x: torch.Tensor, ctx: torch.Tensor, gen: torch.Generator) -> None:
    """q = whitened principal coordinates of the image; k = the text's, rotated at random into that space.

    Each token's key then points at a random direction of the image's region
    structure, so different tokens peak in different regions.
    """
    heads = attn.heads
    dim = attn.to_q.out_features // heads
    img = _principal_coords(x, dim)
    text = _principal_coords(ctx, min(dim, ctx.shape[1] - 1, ctx.shape[0] - 1))
    text = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0][:, : text.shape[0]] @ text
    gains = _head_gains(heads)[:, None, None]
    wq = (img[None] * gains).reshape(heads * dim, -1)
    wk = (text[None] * gains).reshape(heads * dim, -1)
    q = (x @ wq.T).view(x.shape[0], heads, dim).transpose(0, 1)
    k = (ctx @ wk.T).view(ctx.shape[0], heads, dim).transpose(0, 1)
    gain = _fit_gain(q @ k.transpose(1, 2) * attn.scale, CROSS_TARGET_ENTROPY)
    attn.to_q.weight.copy_(wq * math.sqrt(gain))
    attn.to_k.weight.copy_(wk * math.sqrt(gain))


def _calibrate_proj_in(proj: torch.nn.Module, h: torch.Tensor, rank: int) -> None:
    """Make the transformer's input projection keep only the top principal directions of its input.

    The self-attention input is LayerNorm(proj_in(h)). With proj_in of rank r = head
    dim (centred principal coordinates, other channels zero) that LayerNorm output lies
    in an r-dimensional subspace with one fixed norm, so q·k inside it is a pure cosine
    kernel: no key can win by being longer ("hub" keys), only by being similar.
    """
    rows = h.reshape(h.shape[0], h.shape[1], -1)[0].T if h.dim() == 4 else h[0]
    mean = rows.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(rows.T))
    order = torch.argsort(evals, descending=True)[:rank]
    basis = evecs[:, order].T / evals[order][0].sqrt()
    weight = torch.zeros_like(proj.weight.reshape(proj.weight.shape[0], -1))
    weight[: basis.shape[0]] = basis
    proj.weight.copy_(weight.reshape(proj.weight.shape))
    proj.bias.zero_()
    proj.bias[: basis.shape[0]] = -basis @ mean


def _attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


def _calibrate_unet(unet: UNet2DConditionModel, zt: torch.Tensor, emb: torch.Tensor, seed: int,
                    progress: Callable[[str], None]) -> None:
    """One UNet forward; each attention layer is fitted from its own input just before it runs."""
    layers = _attention_layers(unet)
    gen = torch.Generator().manual_seed(seed + 7919)
    done = []

    def hook(module: Attention, args: tuple, kwargs: dict) -> None:
        x = (args[0] if args else kwargs["hidden_states"])[0]
        name = names[id(module)]
        done.append(name)
        progress(f"calibrating attention layer {len(done)}/{len(layers)}: {name}")
        ctx = kwargs.get("encoder_hidden_states")
        if module.is_cross_attention:
            _calibrate_cross(module, x, ctx[0], gen)
        else:
            _calibrate_self(module, x, gen)

    def proj_hook(module: torch.nn.Module, args: tuple) -> None:
        _calibrate_proj_in(module, args[0], head_dims[id(module)])

    names = {id(m): n for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers.values()]
    transformers = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    attn1s = [t.transformer_blocks[0].attn1 for t in transformers]
    head_dims = {id(t.proj_in): a.to_q.out_features // a.heads for t, a in zip(transformers, attn1s)}
    handles += [t.proj_in.register_forward_pre_hook(proj_hook) for t in transformers]
    try:
        unet(zt, TIMESTEP, encoder_hidden_states=emb)
    finally:
        for handle in handles:
            handle.remove()
    if len(done) != len(layers):
        raise RuntimeError(f"calibrated {len(done)} of {len(layers)} attention layers")


def _attention_probs(attn: Attention, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
    """[heads, N, keys] float32 softmax(QKᵀ·scale) for one layer's captured input."""
    heads = attn.heads
    q = attn.to_q(x).view(x.shape[0], heads, -1).transpose(0, 1)
    src = x if ctx is None else ctx
    k = attn.to_k(src).view(src.shape[0], heads, -1).transpose(0, 1)
    return torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)


def measure_attention(unet: UNet2DConditionModel, zt: torch.Tensor, emb: torch.Tensor,
                      labels: np.ndarray) -> dict[str, float]:
    """Entropy, hub ratio and region-following of the layers iSeg reads, on one input.

    self_entropy: mean normalised row entropy of the 64×64 self-attention (all heads);
    hub_ratio: max over keys of the attention a key receives, × N (1 = perfectly even);
    self_region_mass: mean share of a query's attention that stays in its own region;
    cross_entropy: mean normalised entropy of the 16×16/32×32 cross-attention rows;
    cross_regions: how many regions hold the peak of at least one token's cross map.
    """
    layers = _attention_layers(unet)
    wanted = {SELF_LAYER} | {name for names in CROSS_LAYERS.values() for name in names}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def capture(name: str) -> Callable:
        def hook(module: Attention, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["hidden_states"])[0]
            ctx = kwargs.get("encoder_hidden_states")
            captured[name] = (x, None if ctx is None else ctx[0])
        return hook

    handles = [layers[n].register_forward_pre_hook(capture(n), with_kwargs=True) for n in wanted]
    try:
        unet(zt, TIMESTEP, encoder_hidden_states=emb)
    finally:
        for handle in handles:
            handle.remove()

    probs = _attention_probs(layers[SELF_LAYER], *captured[SELF_LAYER])
    logp = probs.clamp_min(1e-30).log()
    n = probs.shape[-1]
    self_entropy = float(-(probs * logp).sum(-1).mean() / math.log(n))
    mean_map = probs.mean(0)
    hub_ratio = _hub_ratio(probs)
    flat = torch.from_numpy(labels.reshape(-1))
    same = flat[:, None] == flat[None, :]
    region_mass = float((mean_map * same).sum(-1).mean())

    cross_ent, peaks = [], set()
    for res, names in CROSS_LAYERS.items():
        maps = []
        for name in names:
            p = _attention_probs(layers[name], *captured[name])
            cross_ent.append(float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(p.shape[-1])))
            maps.append(p.mean(0))
        token_maps = torch.stack(maps).mean(0).T.reshape(-1, res, res)
        token_maps = torch.nn.functional.interpolate(token_maps[None], size=(LATENT_SIZE, LATENT_SIZE),
                                                     mode="bilinear", align_corners=False)[0]
        for m in token_maps:
            region_share = np.bincount(labels.reshape(-1), weights=m.reshape(-1).numpy())
            region_share /= np.bincount(labels.reshape(-1))
            peaks.add(int(region_share.argmax()))
    return {
        "self_entropy": self_entropy,
        "hub_ratio": hub_ratio,
        "self_region_mass": region_mass,
        "cross_entropy": float(np.mean(cross_ent)),
        "cross_regions": len(peaks),
    }


def noised_latent(vae: AutoencoderKL, scheduler: DDIMScheduler, rgb: np.ndarray) -> torch.Tensor:
    """z_t of a 512×512 RGB uint8 image, made as docs/method.md §1.1–1.3 makes it."""
    z0 = vae.encode(_image_tensor(rgb)).latent_dist.mean * vae.config.scaling_factor
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    return scheduler.add_noise(z0, eps, torch.tensor([TIMESTEP]))


def _prompt_embedding(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> torch.Tensor:
    ids = tokenizer(sample_prompt(), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


@torch.no_grad()
def measure_model_dir(model_dir: Path) -> dict[str, float]:
    """Re-measure a saved tiny model from disk: latent_std of the calibration image plus measure_attention().

    Checks what was written, not what was in memory (scaling_factor, calibrated weights).
    """
    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", local_files_only=True).eval()
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler", local_files_only=True)
    rgb, labels = calibration_image()
    z0 = vae.encode(_image_tensor(rgb)).latent_dist.mean * vae.config.scaling_factor
    zt = noised_latent(vae, scheduler, rgb)
    stats = measure_attention(unet, zt, _prompt_embedding(tokenizer, text_encoder), labels)
    return {"latent_std": float(z0.std()), **stats}


def _write_model_index(out_dir: Path) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def folder_size_mb(path: Path) -> float:
    """Total size of the files under `path`, in MB (10⁶ bytes)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


@torch.no_grad()
def build_tiny_model(out_dir: Path, family: str = "sd21", seed: int = 0,
                     progress: Callable[[str], None] = print) -> dict:
    """Build, calibrate and save a tiny SD model folder; returns its attention statistics.

    Same (family, seed) → byte-identical weights. The returned dict holds family, seed,
    size_mb, build_seconds, scaling_factor, latent_std and the measure_attention() numbers.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    spec = FAMILIES[family]
    out_dir = Path(out_dir)
    start = time.monotonic()
    progress(f"building tiny {family} model (seed {seed}) in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(out_dir / "tokenizer", family, locate_vocab(progress))
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer", local_files_only=True)

    torch.manual_seed(seed)
    vae = _vae().eval()
    text_encoder = CLIPTextModel(_text_config(spec, tokenizer.pad_token_id)).eval()
    unet = _unet(spec).eval()
    scheduler = _scheduler()

    rgb, labels = calibration_image()
    _colour_encoder(vae)
    mean = _whiten_latents(vae, rgb)
    progress(f"VAE scaling_factor {vae.config.scaling_factor:.4f} (unit-std latents on the calibration image)")
    zt = noised_latent(vae, scheduler, rgb)
    emb = _prompt_embedding(tokenizer, text_encoder)

    _calibrate_unet(unet, zt, emb, seed, progress)
    stats = measure_attention(unet, zt, emb, labels)

    progress("saving")
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers draws a shard bar even for one small file
    try:
        text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    scheduler.save_pretrained(out_dir / "scheduler")
    _write_model_index(out_dir)

    report = {
        "family": family,
        "seed": seed,
        "size_mb": round(folder_size_mb(out_dir), 2),
        "build_seconds": round(time.monotonic() - start, 1),
        "scaling_factor": float(vae.config.scaling_factor),
        "latent_std": float((mean * vae.config.scaling_factor).std()),
        **stats,
    }
    progress("tiny model ready: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))
    return report
