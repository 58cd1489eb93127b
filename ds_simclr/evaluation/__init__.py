"""Is the encoder any good? Frozen-encoder probes on labelled MRI that installed packages ship.

`atlas` builds the evaluation volume once into the cache, `patches` draws and cuts probe patches,
`probes` scores features, `evaluate` runs the whole protocol for `ds_simclr evaluate`, and `online`
is the cheap version the trainer runs every `eval.every_steps`.
"""
