"""The trainer: data preparation, the training loop and checkpoint writing for ``model.GPT``.

Run it as ``python -m trainer {prepare,train,sample,export-hf} ...`` (see ``trainer/__main__.py``).
"""
