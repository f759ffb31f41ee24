"""`captioner train`: the recipe, the feature cache, the teacher-forced loop and its optional
phases (encoder fine-tuning, self-critical training, detectors), on one process or several."""
