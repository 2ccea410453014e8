"""ToyBench, our DreamBench: evaluation nets trained on the toy world's ground truth and the
metrics of the DreamBooth paper computed with them (subject fidelity, prompt fidelity, class
preservation). The committed net is in toybench/weights (see its manifest for the command)."""
