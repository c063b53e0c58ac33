"""`supir-rt ui`: a browser page for restoring photos, over one `Restorer` loaded once.

* `knobs`: the `RestoreConfig` fields as controls (official names as help; new fields appear by themselves);
* `callbacks`: what the controls do, as plain functions (`RestoreUI`), no Gradio;
* `layout`: the Gradio page wired to them (imports Gradio: ``pip install 'supir-rt[ui]'``);
* `cli`: the ``ui`` sub-command (host, port, queue, temporary folder cleaned at exit).
"""

from supir_rt.ui.callbacks import Cancelled, Reproduced, RestoreUI, RunOutput, UIError

__all__ = ["Cancelled", "Reproduced", "RestoreUI", "RunOutput", "UIError"]
