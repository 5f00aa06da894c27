"""MagicFusion for the AUTOMATIC1111 WebUI: the entry point. All logic lives in lib_magicfusion."""

import modules.scripts as scripts
from modules import script_callbacks

from lib_magicfusion.webui import api, extension, guard, host, settings, ui, xyz

host.adapter().install()


class MagicFusionScript(scripts.Script):
    def title(self):
        return "MagicFusion"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        components, self.infotext_fields, self.paste_field_names = ui.build("img2img" if is_img2img else "txt2img")
        return components

    def process(self, p, *args):
        extension.process(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        extension.before_sampling(p)

    def post_sample(self, p, ps, *args):
        extension.after_sampling(p)

    def postprocess(self, p, processed, *args):
        extension.postprocess(p, processed)


script_callbacks.on_ui_settings(settings.register)
script_callbacks.on_before_ui(xyz.register)
script_callbacks.on_model_loaded(extension.on_model_loaded)


def on_app_started(demo, app):
    api.register(app)
    guard.install(app)  # validates the raw alwayson_scripts args before the WebUI pads them


script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(extension.on_script_unloaded)
