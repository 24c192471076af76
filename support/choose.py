"""The choice rule of 03 (a pruning round) and 04 (the final file): the smallest model close to
student_kd on the selection split. Works on rows of sizes and Scores (support/stats.py); knows
nothing of the model."""
import math

from support.running import UserError, warn


def rule_text(cfg, limit=(0, "")):
    rule = (f"selection loss at most {100 * cfg.max_loss_rise:g}% above student_kd's" if cfg.choose_by == "loss"
            else f"selection accuracy at most {cfg.max_acc_drop} below student_kd's")
    return rule + (f", of at most {limit[0]:,} {limit[1]}" if limit[0] else "")


def smallest_close(rows, size, reference, cfg, what, limit=(0, "")):
    """The smallest of `rows` (by size(row)) whose selection Score row["select"] is close to
    student_kd's there (`reference`, the same images): a mean cross-entropy at most
    (1 + max_loss_rise) times its (choose_by=loss), or at most max_acc_drop of the images fewer
    right (acc); where none is, the best there, with a warning. A row that scored NaN is left out
    (all of them: an error). A budget, limit = (amount, unit), leaves out the rows larger than
    amount (0: no budget); where all are, the smallest, with a warning. On a few hundred images
    the loss is about twice as steady as the accuracy: each image adds how sure the model was,
    not one bit. The row returned says which of the three chose it, in words, as row["chosen_by"]."""
    by_loss = cfg.choose_by == "loss"
    if by_loss and not math.isfinite(reference.loss):
        raise UserError(f"student_kd's selection loss is not finite ({reference.loss}), so no {what} can be "
                        "compared with it: distill it again (02_distill.py), or choose with --choose_by=acc")

    def better(row):  # higher is better
        value = -row["select"].loss if by_loss else row["select"].acc
        return value if value == value else -math.inf

    def close(row):
        if by_loss:
            return row["select"].loss <= reference.loss * (1 + cfg.max_loss_rise)
        return row["select"].correct.sum() >= reference.correct.sum() - images_within(cfg.max_acc_drop, reference.n)
    scored = [r for r in rows if better(r) > -math.inf]  # a model that scored NaN is never chosen
    if not scored:
        raise UserError(f"every {what} scored NaN on the selection split (a diverged model?): none to choose")
    if limit[0]:
        within = [r for r in scored if size(r) <= limit[0]]
        if not within:
            smallest, budget = min(scored, key=size), f"{limit[0]:,} {limit[1]}"
            if any(size(r) <= limit[0] for r in rows):
                why = f"the smallest that scored a number (those of at most {budget} scored NaN)"
                warn(f"no {what} of at most {budget} scored a number on the selection split (those that fit "
                     f"scored NaN); keeping the smallest that did ({size(smallest):,} {limit[1]})")
            else:
                why = f"the smallest (none fits the budget of {budget})"
                warn(f"no {what} has at most {budget}; keeping the smallest ({size(smallest):,} {limit[1]})")
            return chosen_by(smallest, why)
        scored = within
    fits = [r for r in scored if close(r)]
    if fits:
        return chosen_by(min(fits, key=lambda r: (size(r), -better(r))),
                         f"the rule: the smallest {what} with {rule_text(cfg, limit)}")
    warn(f"no {what} passes the rule ({rule_text(cfg, limit)}); keeping the best one there")
    return chosen_by(max(scored, key=better),
                     f"the best on selection (none passed the rule: {rule_text(cfg, limit)})")


def images_within(max_acc_drop, n):
    """How many of n images max_acc_drop allows fewer right: a drop of exactly max_acc_drop passes
    (in floats 0.07 - 0.01 is 0.06000000000000001; the product rounded to 9 places is the decimal one)."""
    return math.floor(round(max_acc_drop * n, 9))


def chosen_by(row, why):
    row["chosen_by"] = why
    return row
