"""`python -m ltm`: the presets with their exact parameter counts, and which backends run here."""
import torch

from ltm import PRESETS, LTMConfig, LTMDecoder, backend_status


def main():
    print(f"{'preset':<10} {'layers':>6} {'d':>5} {'n_z':>4} {'T_fast':>6} {'vocab':>6} {'params':>12}")
    for name in PRESETS:
        cfg = LTMConfig.from_name(name)
        with torch.device("meta"):  # counts only: no memory, no init
            n_params = LTMDecoder(cfg, backend="eager").n_params
        print(f"{name:<10} {cfg.n_layer:>6} {cfg.d_model:>5} {cfg.n_z:>4} {cfg.t_fast:>6} {cfg.vocab_size:>6} "
              f"{n_params:>12,} ({n_params / 1e6:.2f}M)")
    print()
    for backend, (ok, reason) in backend_status().items():
        print(f"backend {backend:<7} {'available' if ok else 'unavailable'}: {reason}")


if __name__ == "__main__":
    main()
