"""`python -m seer_attn.data --train A[,B] --eval C[,D]`: fail when an evaluation document is in the training data."""

import argparse
import logging

from seer_attn.data.sources import check_disjoint

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, help="comma-separated training sources")
    parser.add_argument("--eval", required=True, help="comma-separated evaluation sources")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    train, test = [s for s in args.train.split(",") if s], [s for s in args.eval.split(",") if s]
    check_disjoint(train, test)
    print(f"disjoint: {', '.join(test)} share no document (text, source or title) with {', '.join(train)}")
