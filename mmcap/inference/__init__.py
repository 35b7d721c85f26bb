"""Using a trained model from the shell: `mmcap caption`/`mmcap eval`, result writers, attention plots."""
