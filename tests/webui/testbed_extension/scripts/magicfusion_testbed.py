"""The MagicFusion test bed's helper extension (test code, not part of the product).

``tests/webui/server.py`` installs this folder as ``<data-dir>/extensions/magicfusion-testbed``
in every test WebUI. It does nothing unless a request asks for it:

* At import (the WebUI imports extension scripts before it loads the start-up model) it
  registers the fixtures' tiny open_clip model config, which the SD2 and SDXL fixtures' yaml
  files name as their ``arch``. Where: ``$MAGICFUSION_TESTBED_OPENCLIP`` (a config file or a
  folder of them; server.py sets it), else ``<dir above --ckpt-dir>/open_clip`` if it exists.
* An always-on script, "MagicFusion testbed", whose one API argument is a dict. ``{}`` (the
  default) does nothing. ``{"nested": {...}}`` starts, in ``postprocess_image`` of the named
  image of the outer generation, a nested ``process_images`` the way ADetailer does: a new
  StableDiffusionProcessingTxt2Img/Img2Img that shares the outer ``p.scripts``, with the
  outer ``script_args`` (MagicFusion runs inside with the outer's arguments) or with
  MagicFusion's replaced. See ``NESTED_FIELDS`` for the fields.
* GET routes under ``/magicfusion-testbed/v1/`` (they honour ``--api-auth``): ``main-weights``,
  ``loaded-networks``, ``rss``, ``model``, ``conditioning`` and ``nested``.

It runs in AUTOMATIC1111 and in WebUI Forge. On Forge (``IS_FORGE``) the routes that look at the
main model read Forge's ``forge_objects`` (its engines have no ``model``/``first_stage_model``),
and ``checkpoint=`` switches through Forge's own ``checkpoint_change`` + ``forge_model_reload``.
"""

from __future__ import annotations

import base64
import ctypes
import gc
import hashlib
import importlib.util
import io
import os
import secrets
import threading
import traceback

import gradio as gr
from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from modules import call_queue, processing, script_callbacks, scripts, sd_models, shared

TITLE = "MagicFusion testbed"
PREFIX = "/magicfusion-testbed/v1"
OPENCLIP_ENV = "MAGICFUSION_TESTBED_OPENCLIP"
INNER_FLAG = "magicfusion_testbed_inner"  # set on a nested p: it never nests again
PENDING = "magicfusion_testbed_pending"  # on the outer p: nested results for postprocess
INFOTEXT_KEY = "Testbed nested"  # written into the nested image's infotext (its mode)
IS_FORGE = importlib.util.find_spec("modules_forge") is not None
# Tensors Forge's CLIP wrapper (backend/nn/clip.py) adds that no checkpoint holds: a logit scale,
# and for CLIP-L a text projection left uninitialised. Left out of the text-encoder digest.
FORGE_EXTRA_TENSORS = ("logit_scale", "clip_l.transformer.text_projection.weight")

# The fields of "nested" and their defaults (None: the outer generation's value for that image).
NESTED_FIELDS = {
    "after_image": 0,  # the outer image index (iteration * batch_size + batch index) that triggers it
    "mode": "txt2img",  # "txt2img" or "img2img" (the init image is the outer image)
    # "outer": the outer script_args as they are; "disabled": MagicFusion gets {"enabled": False};
    # a dict: MagicFusion gets that dict (its named-fields form)
    "magicfusion": "outer",
    "prompt": None, "negative_prompt": None, "seed": None, "steps": None, "cfg_scale": None,
    "sampler_name": None, "width": None, "height": None,
    "denoising_strength": 0.5,  # img2img only
    "mask": None,  # img2img only: None, or "center" (inpaint the central half, the rest kept)
    "inpaint_full_res": False,  # img2img with a mask: ADetailer's "only masked" crop-and-upscale
    "replace": False,  # True: the outer image becomes the nested one (as ADetailer does)
}

_lock = threading.Lock()
_state = {"depth": 0, "runs": 0, "recursion_blocked": 0, "errors": 0, "last": None}


# --------------------------------------------------------------------------- open_clip

def _register_openclip() -> str | None:
    candidates = []
    if os.environ.get(OPENCLIP_ENV):
        candidates.append(os.environ[OPENCLIP_ENV])
    ckpt_dir = getattr(shared.cmd_opts, "ckpt_dir", None)
    if ckpt_dir:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "open_clip"))
    for path in candidates:
        if os.path.exists(path):
            import open_clip
            before = set(open_clip.list_models())
            open_clip.add_model_config(path)
            added = sorted(set(open_clip.list_models()) - before)
            print(f"[magicfusion-testbed] registered open_clip model config(s) {added} from {path}", flush=True)
            return path
    if os.environ.get(OPENCLIP_ENV):
        print(f"[magicfusion-testbed] {OPENCLIP_ENV}={os.environ[OPENCLIP_ENV]} does not exist", flush=True)
    return None


OPENCLIP_CONFIG_PATH = _register_openclip()


# --------------------------------------------------------------------------- the nested generation

def _request(args) -> dict | None:
    """The nested request of this generation's script args, or None when not asked."""
    if not args or not isinstance(args[0], dict) or not args[0]:
        return None
    unknown = set(args[0]) - {"nested"}
    if unknown:
        raise ValueError(f"{TITLE}: unknown key(s) {sorted(unknown)}; the args are {{\"nested\": {{...}}}}")
    nested = args[0].get("nested")
    if nested is None:
        return None
    if not isinstance(nested, dict):
        raise ValueError(f"{TITLE}: nested must be an object, got {type(nested).__name__}")
    unknown = set(nested) - set(NESTED_FIELDS)
    if unknown:
        raise ValueError(f"{TITLE}: unknown nested field(s) {sorted(unknown)}; known: {sorted(NESTED_FIELDS)}")
    req = {**NESTED_FIELDS, **nested}
    if req["mode"] not in ("txt2img", "img2img"):
        raise ValueError(f"{TITLE}: mode must be txt2img or img2img, got {req['mode']!r}")
    if not (req["magicfusion"] in ("outer", "disabled") or isinstance(req["magicfusion"], dict)):
        raise ValueError(f"{TITLE}: magicfusion must be \"outer\", \"disabled\" or an object")
    if req["mask"] not in (None, "center"):
        raise ValueError(f"{TITLE}: mask must be null or \"center\"")
    return req


def _magicfusion_script(p):
    for s in p.scripts.alwayson_scripts:
        if s.title() == "MagicFusion":
            return s
    return None


def _inner_script_args(p, req: dict) -> list:
    args = list(p.script_args)
    if req["magicfusion"] == "outer":
        return args
    mf = _magicfusion_script(p)
    if mf is None:
        raise RuntimeError(f"{TITLE}: no MagicFusion script to give other arguments to")
    # MagicFusion reads one dict in its first slot as its named form and ignores the rest
    args[mf.args_from] = {"enabled": False} if req["magicfusion"] == "disabled" else dict(req["magicfusion"])
    return args


def _center_mask(width: int, height: int):
    from PIL import Image, ImageDraw
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 4, width * 3 // 4 - 1, height * 3 // 4 - 1), fill=255)
    return mask


def _make_inner(p, req: dict, index: int, image):
    def pick(name, outer):
        return outer if req[name] is None else req[name]

    kw = {
        "sd_model": p.sd_model, "outpath_samples": p.outpath_samples, "outpath_grids": p.outpath_grids,
        "prompt": pick("prompt", p.all_prompts[index]),
        "negative_prompt": pick("negative_prompt", p.all_negative_prompts[index]),
        "seed": pick("seed", p.all_seeds[index]), "subseed": p.all_subseeds[index],
        "subseed_strength": p.subseed_strength, "sampler_name": pick("sampler_name", p.sampler_name),
        "scheduler": p.scheduler, "batch_size": 1, "n_iter": 1, "steps": pick("steps", p.steps),
        "cfg_scale": pick("cfg_scale", p.cfg_scale), "width": pick("width", p.width),
        "height": pick("height", p.height), "do_not_save_samples": True, "do_not_save_grid": True,
        "override_settings": {}, "extra_generation_params": {INFOTEXT_KEY: req["mode"]},
    }
    if req["mode"] == "txt2img":
        inner = processing.StableDiffusionProcessingTxt2Img(**kw)
    else:
        mask = _center_mask(image.width, image.height) if req["mask"] == "center" else None
        inner = processing.StableDiffusionProcessingImg2Img(
            **kw, init_images=[image], resize_mode=0, denoising_strength=req["denoising_strength"], mask=mask,
            mask_blur=0, inpainting_fill=1, inpaint_full_res=bool(req["inpaint_full_res"]),
            inpaint_full_res_padding=8)
    setattr(inner, INNER_FLAG, True)
    inner.is_api = getattr(p, "is_api", False)
    inner.scripts = p.scripts
    inner.script_args = _inner_script_args(p, req)
    return inner


def _b64png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _run_nested(p, pp, req: dict, index: int) -> None:
    inner = _make_inner(p, req, index, pp.image)
    with _lock:
        _state["depth"] += 1
    try:
        processed = processing.process_images(inner)
    finally:
        with _lock:
            _state["depth"] -= 1
        inner.close()
    if not processed.images:
        raise RuntimeError(f"{TITLE}: the nested generation returned no image")
    image, infotext = processed.images[0], processed.infotexts[0] if processed.infotexts else ""
    getattr(p, PENDING).append((image, infotext))
    with _lock:
        _state["runs"] += 1
        _state["last"] = {
            "ok": True, "run": _state["runs"], "outer_index": index, "mode": req["mode"],
            "magicfusion": req["magicfusion"] if isinstance(req["magicfusion"], str) else "custom",
            "replaced": bool(req["replace"]), "seed": processed.seed, "infotext": infotext,
            "images": [_b64png(im) for im in processed.images], "infotexts": list(processed.infotexts),
        }
    if req["replace"]:
        pp.image = image


class MagicFusionTestbed(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.State(value={})]  # one API slot; the default asks for nothing

    def postprocess_image(self, p, pp, *args):
        try:
            req = _request(args)
            if req is None:
                return
            if getattr(p, INNER_FLAG, False) or _state["depth"] > 0:
                with _lock:
                    _state["recursion_blocked"] += 1
                return
            index = p.iteration * p.batch_size + p.batch_index
            if index != int(req["after_image"]):
                return
            if not hasattr(p, PENDING):
                setattr(p, PENDING, [])
            _run_nested(p, pp, req, index)
        except Exception as e:
            with _lock:
                _state["errors"] += 1
                _state["last"] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            raise  # the WebUI reports it and carries on with the outer image

    def postprocess(self, p, processed, *args):
        """The nested images (and infotexts) are appended to the outer result, so the API
        returns them after the outer images (MagicFusion's own mask pictures, if asked for, may
        come after them: look for the infotext key, or use GET .../nested)."""
        for image, infotext in getattr(p, PENDING, None) or []:
            processed.images.append(image)
            processed.infotexts.append(infotext)
        if hasattr(p, PENDING):
            setattr(p, PENDING, [])


# --------------------------------------------------------------------------- routes

def _credentials() -> dict[str, str]:
    text = getattr(shared.cmd_opts, "api_auth", None)
    if not text:
        return {}
    return dict(item.split(":", 1) for item in text.strip('"').replace("\n", "").split(",") if ":" in item)


def _tensor_digest(module, skip: tuple = ()) -> dict:
    """A digest of a module's weights that ignores key names (so the WebUI's hijack wrappers do
    not change it): sha256 over the sorted sha256s of its state_dict tensors, each taken over
    ``"<dtype>|<shape>|"`` and the tensor's bytes (dtype as in "float32", shape as in "4,3,3").
    make_fixtures.py writes the same digest of each fixture (its fp16 weights upcast to
    fp32, as the WebUI runs them with --no-half) into the manifest.

    On Forge (make_forge_fixtures.py writes the manifest's digests) three things differ: keys
    ending in ``skip`` are left out; a tensor listed twice (Forge's prompt engine keeps the
    token embedding under a second name) counts once; and float tensors are taken in fp32,
    because Forge stores the text encoder in fp16 on the CPU and the UNet in fp32 (the fixtures'
    weights are fp16 values, so the upcast is exact): the digest tells the values, not the
    storage dtype. ``bytes`` is the memory as stored."""
    import torch
    digests, n, nbytes, seen = [], 0, 0, set()
    for key, t in module.state_dict().items():
        if skip and key.endswith(skip):
            continue
        if IS_FORGE:
            ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if t.numel() and ident in seen:
                continue
            seen.add(ident)
        nbytes += t.numel() * t.element_size()
        t = t.detach().to("cpu")
        if IS_FORGE and t.is_floating_point():
            t = t.float()
        t = t.contiguous()
        h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}|{','.join(map(str, t.shape))}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        digests.append(h.hexdigest())
        n += t.numel()
    return {"sha256": hashlib.sha256("".join(sorted(digests)).encode()).hexdigest(), "tensors": len(digests),
            "elements": n, "bytes": nbytes}


def _text_encoder(m):
    if IS_FORGE:
        return m.forge_objects.clip.cond_stage_model
    return m.conditioner if getattr(m, "is_sdxl", False) else m.cond_stage_model


def _unet(m):
    return m.forge_objects.unet.model.diffusion_model if IS_FORGE else m.model.diffusion_model


def _vae(m):
    return m.forge_objects.vae.first_stage_model if IS_FORGE else m.first_stage_model


def _use_checkpoint(name: str | None) -> None:
    """Make `name` the loaded main model for a route (not written to the settings: the next
    generation loads the settings' checkpoint again, as after an override). On Forge, without a
    name, load the settings' checkpoint if nothing is loaded yet (Forge loads lazily, at the
    first generation)."""
    info = sd_models.get_closet_checkpoint_match(name) if name else None
    if name and info is None:
        raise HTTPException(status_code=404, detail=f"no checkpoint {name!r}")
    if IS_FORGE:
        from modules_forge import main_entry
        old = shared.opts.data.get("sd_model_checkpoint")
        changed = bool(name) and main_entry.checkpoint_change(info.title, save=False)
        try:
            sd_models.forge_model_reload()
        finally:
            if changed and old:
                main_entry.checkpoint_change(old, save=False)  # the settings as they were
        return
    if not name:
        return
    with sd_models.SkipWritingToConfig():
        sd_models.reload_model_weights(info=info)


def _parameterization(m):
    if IS_FORGE:
        return getattr(m.forge_objects.unet.model.predictor, "prediction_type", None)
    return getattr(m, "parameterization", None)


def main_weights(checkpoint: str | None = None) -> dict:
    with call_queue.queue_lock:  # never in the middle of a generation
        _use_checkpoint(checkpoint)
        m = shared.sd_model
        te_skip = FORGE_EXTRA_TENSORS if IS_FORGE else ()
        return {"checkpoint": m.sd_checkpoint_info.title, "unet": _tensor_digest(_unet(m)),
                "text_encoder": _tensor_digest(_text_encoder(m), te_skip), "vae": _tensor_digest(_vae(m))}


def loaded_networks() -> dict:
    import sys
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "loaded_networks"):
        return {"available": False, "loaded": []}
    return {"available": True, "loaded": [
        {"name": n.name, "te_multiplier": n.te_multiplier, "unet_multiplier": n.unet_multiplier,
         "dyn_dim": getattr(n, "dyn_dim", None)} for n in networks.loaded_networks]}


def rss(trim: bool = False) -> dict:
    """VmRSS and VmHWM of the WebUI process (bytes) after gc.collect(); with trim=true also
    after glibc's malloc_trim(0) (freed heap memory returned to the system)."""
    gc.collect()
    trimmed = None
    if trim:
        try:
            trimmed = bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
        except OSError:
            trimmed = None
    out = {"pid": os.getpid(), "trimmed": trimmed}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def model(checkpoint: str | None = None) -> dict:
    with call_queue.queue_lock:
        _use_checkpoint(checkpoint)
        m = shared.sd_model
        te = _text_encoder(m)
        if IS_FORGE:
            encoders = list(te.children())  # clip_l (SDXL: and clip_g)
        else:
            encoders = list(te.embedders) if getattr(m, "is_sdxl", False) else [te]
        return {
            "checkpoint": m.sd_checkpoint_info.title, "model_name": m.sd_checkpoint_info.model_name,
            **{k: bool(getattr(m, k, False)) for k in ("is_sd1", "is_sd2", "is_sdxl", "is_sd3")},
            "model_type": str(getattr(getattr(m, "model_type", None), "name", None)),
            "parameterization": _parameterization(m), "host": "forge" if IS_FORGE else "a1111",
            "text_encoders": [type(e).__name__ for e in encoders],
            "wrapped": [type(getattr(e, "transformer" if IS_FORGE else "wrapped", e)).__name__ for e in encoders],
            "unet_parameters": sum(p.numel() for p in _unet(m).parameters()),
            "unet_dtype": str(next(_unet(m).parameters()).dtype),
        }


def conditioning(prompt: str = "", checkpoint: str | None = None, width: int = 64, height: int = 64,
                 negative: bool = False, values: bool = False) -> dict:
    """The main model's learned conditioning of one prompt: per part (a tensor: "crossattn";
    SDXL: "crossattn" and "vector"), its shape, sha256 of its float32 bytes, mean and std, and
    with values=true its numbers."""
    import torch
    from modules import devices, prompt_parser
    with call_queue.queue_lock:
        _use_checkpoint(checkpoint)
        m = shared.sd_model
        batch = prompt_parser.SdConditioning([prompt], is_negative_prompt=negative, width=width, height=height)
        with torch.no_grad(), devices.autocast():
            c = m.get_learned_conditioning(batch)
        parts = c if isinstance(c, dict) else {"crossattn": c}
        out = {"checkpoint": m.sd_checkpoint_info.title, "parts": {}}
        for key, t in parts.items():
            t = t.detach().float().cpu().contiguous()
            part = {"shape": list(t.shape), "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
                    "mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0}
            if values:
                part["values"] = t.reshape(-1).tolist()
            out["parts"][key] = part
        return out


def nested() -> dict:
    with _lock:
        return {k: _state[k] for k in ("runs", "recursion_blocked", "errors", "last")}


_BASIC_CREDENTIALS = Depends(HTTPBasic(auto_error=False))


def _auth(credentials: HTTPBasicCredentials = _BASIC_CREDENTIALS):
    allowed = _credentials()
    if not allowed:
        return True
    if credentials and credentials.username in allowed and secrets.compare_digest(
            credentials.password.encode(), allowed[credentials.username].encode()):
        return True
    raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})


def _register_routes(_demo, app) -> None:
    deps = [Depends(_auth)]
    for path, fn in (("main-weights", main_weights), ("loaded-networks", loaded_networks), ("rss", rss),
                     ("model", model), ("conditioning", conditioning), ("nested", nested)):
        app.add_api_route(f"{PREFIX}/{path}", fn, methods=["GET"], dependencies=deps)


script_callbacks.on_app_started(_register_routes)
