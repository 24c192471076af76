"""The machinery behind the stages, knowing nothing of the model: settings and presets,
running (errors, Ctrl-C), files, images, the teacher bank's storage, statistics, reports and
the quantized file format. Nothing here imports common.py or a stage (tests/test_layout.py)."""
