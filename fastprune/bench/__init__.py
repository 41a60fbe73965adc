"""The benchmark harness behind ``fastprune bench``: the command line (:mod:`.cli`), the
criteria comparison (:mod:`.harness`), data sets (:mod:`.data`), the small models it
trains (:mod:`.models`) and the loaders of the published reference checkpoints
(:mod:`.reference`). The library proper does not import it."""
