"""Federated instruction tuning with hf_perfit: `perfit federate` as an `accelerate launch` script.

    accelerate launch recipes/perfit_sft.py --config recipes/smollm2-135m/perfit/config_demo.yaml
    accelerate launch --cpu --num_processes 2 recipes/perfit_sft.py --config ... --output_dir outputs/dp2
    python recipes/perfit_sft.py --config ... --num_rounds 5 --strategy fedit

Every key of `hf_perfit.federated.FederatedConfig` works in the YAML and as a `--key value` flag (flags win), exactly
as for `perfit federate`: `trl.TrlParser` over one dataclass whose keys are TRL's (`trl.ModelConfig`: model and LoRA;
`trl.SFTConfig`: learning rate, batch, length, seed, output_dir), PerFIT's (`PerFITLoraConfig`), FedAMoLE's
(`MoLEConfig`) and the federation's own (`FederatedArguments`); docs/federated.md § Config keys.

Under `accelerate launch --num_processes N` each client's local training is data-parallel across the N processes (each
batch split N ways), the coordinator runs in lockstep in every process, and only the main process writes files. To train one PerFIT adapter without a federation, see recipes/perfit_single.py.
"""

import sys

from hf_perfit.distributed import process_state, relaunch_cpu_data_parallel
from hf_perfit.federated import FederatedConfig, run_federated
from hf_perfit.federated.config import ConfigParser, federated_parser


def main(config: FederatedConfig) -> None:
    summary = run_federated(config)
    if process_state().is_main_process:
        print(
            f"{config.strategy}: mean personalized perplexity {summary['mean_perplexity']:.3f} after "
            f"{config.num_rounds} rounds; per-client table in {config.output_dir}/results.md"
        )


def make_parser() -> ConfigParser:
    return federated_parser(prog="perfit_sft.py")


if __name__ == "__main__":
    relaunch_cpu_data_parallel()  # `accelerate launch --cpu --num_processes N` without MPI: start the N processes
    try:  # a malformed YAML, an unknown key or a bad value: one line naming it and the fix, not a traceback
        (config,) = make_parser().parse_args_and_config()
    except (OSError, ValueError) as err:
        sys.exit(f"perfit_sft.py: error: {err}")
    main(config)
