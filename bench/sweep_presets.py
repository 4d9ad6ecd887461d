import sys, dataclasses, torch
sys.path.insert(0, ".")
from pathlib import Path
from model import thinkingvit as tv
from model.data import load_fashion_mnist
from model.preprocess import FASHION_MNIST
from model.train import TrainSettings, train
name, depth, hd, patch, epochs, lr, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
tv.PRESETS[name] = tv.ThinkingViTConfig(img_size=28, patch_size=patch, in_chans=1, num_classes=10, depth=depth, head_dim=hd, stages=(3,6))
torch.set_num_threads(4)
tr, te = load_fashion_mnist("train", ".data"), load_fashion_mnist("test", ".data")
out = Path(sys.argv[10]) / f"{name}.safetensors"
s = train(TrainSettings(preset=name, epochs=epochs, lr=lr, batch_size=bs, erase_prob=float(sys.argv[8]), label_smoothing=float(sys.argv[9])), tr, te, FASHION_MNIST, out, progress=False, device="cuda")
print(name, "FINAL", s["final_test_acc"], s["train_seconds"])
