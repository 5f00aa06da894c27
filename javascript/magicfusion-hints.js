// Hover hints for the MagicFusion controls, through A1111's javascript/hints.js: its global
// `titles` map is keyed by a control's label text, and hints.js sets the matching text as the
// title (tooltip) of every span, button and input that shows that label.
//
// The texts are the `hint` metadata of the FusionParams fields in lib_magicfusion/params.py,
// keyed by their `label` metadata ("MagicFusion", the accordion's header, gets the hint of
// `enabled`). tests/unit/test_hints.py checks that the two agree; on a mismatch it prints the
// block to paste here. Keep the object between the markers valid JSON.
(function() {
    var magicfusionHints = /* BEGIN MAGICFUSION HINTS */ {
        "Enable MagicFusion": "Fuse the main checkpoint (general model) with expert checkpoints at every sampling step.",
        "k general": "Focus of the general model's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
        "Fusion start": "Fraction of the sampling steps at which fusion begins.",
        "Fusion end": "Fraction of the sampling steps at which fusion ends.",
        "Outside the window": "Which model runs alone before and after the fusion window; the others are not evaluated there.",
        "Blur size": "Box blur of the saliency maps, in latent pixels (4 as in the paper; 0 or 1 = none).",
        "Saliency baseline": "general: each expert's guidance is measured against the general model's uncond (official code); own: against its own (paper).",
        "Expert text encoder": "Which text encoder encodes the expert prompts: each expert's own, or the main model's (official code).",
        "Apply in hires fix pass": "Also fuse during the hires fix second pass.",
        "Show fusion mask": "Add the final fusion mask and a strip of masks over the steps to the gallery (one colour per model).",
        "Fusion method": "official: the paper's code, a hard per-pixel switch of whole guided predictions. stable: each model's guidance against its own uncond, and masks that keep their choice over the steps (see Mask memory). average: the mean of the guided predictions, a baseline.",
        "Mask memory": "stable method: how much of the earlier steps' saliency each step's mask keeps (a moving average over the steps; 0 = each step decides afresh, as the official code does).",
        "Enable expert 1": "Use this expert unit. Unit 1 is on by default, the others off.",
        "Expert checkpoint": "An installed checkpoint (title, name or hash). The same as the main checkpoint fuses one model with two prompts.",
        "Expert prompt": "Prompt for this expert; empty uses the main prompt.",
        "Expert negative prompt": "Negative prompt for this expert; empty uses the main negative prompt.",
        "k expert": "Focus of this expert's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
        "Expert CFG scale": "Guidance scale of this expert; 0 uses the main CFG scale.",
        "Enable expert 2": "Use this expert unit. Unit 1 is on by default, the others off.",
        "Expert 2 checkpoint": "An installed checkpoint (title, name or hash). The same as the main checkpoint fuses one model with two prompts.",
        "Expert 2 prompt": "Prompt for this expert; empty uses the main prompt.",
        "Expert 2 negative prompt": "Negative prompt for this expert; empty uses the main negative prompt.",
        "k expert 2": "Focus of this expert's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
        "Expert 2 CFG scale": "Guidance scale of this expert; 0 uses the main CFG scale.",
        "Enable expert 3": "Use this expert unit. Unit 1 is on by default, the others off.",
        "Expert 3 checkpoint": "An installed checkpoint (title, name or hash). The same as the main checkpoint fuses one model with two prompts.",
        "Expert 3 prompt": "Prompt for this expert; empty uses the main prompt.",
        "Expert 3 negative prompt": "Negative prompt for this expert; empty uses the main negative prompt.",
        "k expert 3": "Focus of this expert's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
        "Expert 3 CFG scale": "Guidance scale of this expert; 0 uses the main CFG scale.",
        "Enable expert 4": "Use this expert unit. Unit 1 is on by default, the others off.",
        "Expert 4 checkpoint": "An installed checkpoint (title, name or hash). The same as the main checkpoint fuses one model with two prompts.",
        "Expert 4 prompt": "Prompt for this expert; empty uses the main prompt.",
        "Expert 4 negative prompt": "Negative prompt for this expert; empty uses the main negative prompt.",
        "k expert 4": "Focus of this expert's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
        "Expert 4 CFG scale": "Guidance scale of this expert; 0 uses the main CFG scale.",
        "MagicFusion": "Fuse the main checkpoint (general model) with expert checkpoints at every sampling step.",
        "\u23cf\ufe0f": "MagicFusion: unload the expert checkpoints now (they are loaded again when needed)"
    } /* END MAGICFUSION HINTS */;

    if (typeof titles !== "object" || titles === null) return; // not the A1111 page
    for (var label in magicfusionHints) {
        titles[label] = magicfusionHints[label];
    }
})();
