"""The generated sample (no data/food-11 and no --data_dir): sizes that run the whole pipeline
in under a minute on a 2-core CPU, and what so short a run needs, for whichever of these
settings a script has and the user left alone."""

img_size = 32
resize = 36
batch_size = 32
epochs = 6
finetune_epochs = 2
ckpt_dir = "checkpoints/sample"
repeats = 5  # 05's timing rounds
mix = "none"  # six epochs are too few for mixed views: CutMix cost the scratch student 5 points here and the distilled one 21
