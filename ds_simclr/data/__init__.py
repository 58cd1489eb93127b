"""MRI data: nnSSL manifest -> preprocessed patch store -> per-rank pair loader -> views on the device.

Modules: `options` (spec sections), `manifest`, `volume_io` + `foreground` + `resample` + `preprocess`, `store`, `demo`, `source`
(which store a spec trains from), `sampling` + `loader`, and the torch-only device code `recipe`,
`params` (seeded draws) and `augment` (batched views), plus `bench` and `synthetic` (tiny volumes
at any count for scale tests and benchmarks).
"""
