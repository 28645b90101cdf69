"""The `trl-ladi` command line: `trl-ladi eval ...`, `trl-ladi default-model ...`."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="trl-ladi", description="LaDi-RL tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)

    from trl_ladi import evaluation, default_model

    eval_parser = subparsers.add_parser("eval", help="pass@k curves of one or more models; writes JSON and a PNG.")
    evaluation.add_eval_arguments(eval_parser)
    eval_parser.set_defaults(run=evaluation.eval_command)

    model_parser = subparsers.add_parser(
        "default-model", help="Print the local directory of the embedded default model, converting it on first use."
    )
    default_model.add_default_model_arguments(model_parser)
    model_parser.set_defaults(run=default_model.default_model_command)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
