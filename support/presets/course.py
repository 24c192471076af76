"""recipe = "course": the homework's choices (the seed code's dataset.py, the TA's notebook),
for whichever of these settings a script has and the user left alone (neither given on the
command line nor edited at the top of the script)."""

img_size = 256  # the course's crops
resize = -1  # native scale: RandomCrop(256, pad_if_needed, symmetric) / CenterCrop(256), no resizing
rotate = 15.0  # RandomRotation(15)
jitter = 0.0  # no colour jitter
mix = "none"  # no mixup or CutMix
norm = "none"  # inputs in [0, 1], no mean/std normalisation
lr = 1e-3  # AdamW at a constant learning rate
schedule = "constant"
weight_decay = 0.01  # AdamW's default
label_smoothing = 0.0
batch_size = 32  # the TA's notebook (the seed code used 4)
temperature = 20.0
alpha = 0.5
prune_count = 5  # the seed code's pruning: 5 rounds, round k keeping 0.95**k
prune_rate = 0.95
finetune_epochs = 5
prune_groups = "4,5,6,7"  # the channel groups its width_mult shrinks
method = "uniform"
channel_multiple = 1  # the exact counts round(keep * width)
sparsity = 0.0  # no L1 on the gammas
sparsity_epochs = 0
variants = "fp16,q8"  # float16 and 8 bits per tensor
qat_variants = ""  # no quantization-aware fine-tuning
