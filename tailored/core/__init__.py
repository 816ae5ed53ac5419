"""The exact core: pruning gates, the masked model, the surgery that removes pruned units, and the export.

Pure torch / transformers / peft (no Lightning): every module here can be used and tested on its own.
"""
