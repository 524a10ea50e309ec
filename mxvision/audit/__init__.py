"""Does the model see the nodule? Heatmaps, the pointing game, shortcut audits, lesion insertion, a detector."""
