"""Federated instruction tuning with hf_perfit: `perfit federate` as an `accelerate launch` script.

    accelerate launch recipes/perfit_sft.py --config recipes/smollm2-135m/perfit/config_demo.yaml
    accelerate launch --cpu --num_processes 2 recipes/perfit_sft.py --config ... --output_dir outputs/dp2
    python recipes/perfit_sft.py --config ... --num_rounds 5 --strategy fedit

Every key of `hf_perfit.federated.FederatedConfig` works in the YAML and as a `--key value` flag (flags win), exactly
as for `perfit federate`. Under `accelerate launch --num_processes N` each client's local training is data-parallel
across the N processes (each batch split N ways), the coordinator runs in lockstep in every process, and only the
main process writes files. To train one PerFIT adapter without a federation, see recipes/perfit_single.py.
"""

import sys

from hf_perfit.cli import check_yaml_config, federate_parser
from hf_perfit.distributed import process_state, relaunch_cpu_data_parallel
from hf_perfit.federated import FederatedConfig, run_federated


def main(config: FederatedConfig) -> None:
    summary = run_federated(config)
    if process_state().is_main_process:
        print(
            f"{config.strategy}: mean personalized perplexity {summary['mean_perplexity']:.3f} after "
            f"{config.num_rounds} rounds; per-client table in {config.output_dir}/results.md"
        )


def make_parser():
    return federate_parser(prog="perfit_sft.py")


if __name__ == "__main__":
    relaunch_cpu_data_parallel()  # `accelerate launch --cpu --num_processes N` without MPI: start the N processes
    try:
        check_yaml_config(sys.argv[1:])  # a malformed YAML: file, line, column and the fix, not PyYAML's traceback
    except (OSError, ValueError) as err:
        sys.exit(f"perfit_sft.py: error: {err}")
    (config,) = make_parser().parse_args_and_config()
    main(config)
