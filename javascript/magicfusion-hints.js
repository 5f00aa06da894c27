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
        "Enable MagicFusion": "Fuse the main checkpoint (general model) with an expert checkpoint at every sampling step.",
        "Expert checkpoint": "An installed checkpoint (title, name or hash). The same as the main checkpoint fuses one model with two prompts.",
        "Expert prompt": "Prompt for the expert model; empty uses the main prompt.",
        "Expert negative prompt": "Negative prompt for the expert model; empty uses the main negative prompt.",
        "k general": "Focus of the general model's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
        "k expert": "Focus of the expert model's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
        "Expert CFG scale": "Guidance scale of the expert model; 0 uses the main CFG scale.",
        "Fusion start": "Fraction of the sampling steps at which fusion begins.",
        "Fusion end": "Fraction of the sampling steps at which fusion ends.",
        "Outside the window": "Which model runs alone before and after the fusion window; the other one is not evaluated there.",
        "Blur size": "Box blur of the saliency maps, in latent pixels (4 as in the paper; 0 or 1 = none).",
        "Saliency baseline": "general: the expert's guidance is measured against the general model's uncond (official code); own: against its own (paper).",
        "Expert text encoder": "Which text encoder encodes the expert prompts: the expert's own, or the main model's (official code).",
        "Apply in hires fix pass": "Also fuse during the hires fix second pass.",
        "Show fusion mask": "Add the final fusion mask and a strip of masks over the steps to the gallery (white = expert).",
        "MagicFusion": "Fuse the main checkpoint (general model) with an expert checkpoint at every sampling step.",
        "\u23cf\ufe0f": "MagicFusion: unload the expert checkpoint now (it is loaded again when needed)"
    } /* END MAGICFUSION HINTS */;

    if (typeof titles !== "object" || titles === null) return; // not the A1111 page
    for (var label in magicfusionHints) {
        titles[label] = magicfusionHints[label];
    }
})();
