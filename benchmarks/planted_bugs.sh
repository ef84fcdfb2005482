#!/usr/bin/env bash
# Issue 21's six bugs that no test caught in 0.3, planted one at a time in a scratch copy of this tree; each line
# says which test ran and pytest's verdict ("1 failed" is the point: the test catches the bug). Nothing here
# changes this checkout.
#   benchmarks/planted_bugs.sh            (uses .venv/bin/python, or $PYTHON)
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

plant() {  # description, file, sed expression, test
  local tree=$SCRATCH/tree
  rm -rf "$tree" && mkdir -p "$tree"
  cp -r src tests configs results pyproject.toml "$tree"/
  local before after
  before=$(md5sum < "$tree/$2")
  sed -i "$3" "$tree/$2"
  after=$(md5sum < "$tree/$2")
  if [ "$before" == "$after" ]; then echo "$1: the bug could not be planted (the code moved?)"; return; fi
  local verdict
  verdict=$(cd "$tree" && PYTHONPATH="$tree/src" OMP_WAIT_POLICY=PASSIVE timeout 900 "$PY" -m pytest -q \
            -p no:cacheprovider --basetemp="$SCRATCH/bt" -x "$4" 2>&1 | tail -1)
  echo "$1 | $4 | $verdict"
}

plant "run health judged on the last epoch only" src/ckptkd/training/loop.py \
  's/        verdict = health.assess(progress.history + \[record\])/        verdict = health.assess([record])/' \
  tests/test_one_loop.py::test_a_rising_loss_is_flagged_alike_alone_and_in_every_kind_of_group
plant "resume does not restore the global RNG" src/ckptkd/run/state.py \
  's/    torch.set_rng_state(tensors\["rng.torch"\])/    pass/' \
  tests/test_train.py::test_resume_from_every_epoch_is_bit_identical
plant "teacher-cache key without the crop padding" src/ckptkd/teachers/cache.py \
  's/"pad": data.pad, //' \
  tests/test_cache.py::test_a_cache_is_keyed_by_the_crop_padding
plant "I(Y;F) scored on the probe's fit part" src/ckptkd/selection/info/estimators.py \
  's/    probe_ce = _cross_entropy(columns\["held"\], codes\[held\], probe)/    probe_ce = _cross_entropy(columns["fit"], codes[fit], probe)/' \
  tests/test_info.py::test_i_yf_is_scored_on_held_out_images_a_lower_bound_that_overfitting_cannot_inflate
plant "p_target's direction flipped" src/ckptkd/selection/criteria.py \
  's/(("p_target_t", -1),)/(("p_target_t", 1),)/' \
  tests/test_analysis.py::test_every_criterion_picks_in_its_documented_direction
plant "the frozen teacher's .eval() removed" src/ckptkd/teachers/loading.py \
  '/^        model = checkpoint.build_model("cpu")$/{n;s/        model.eval()/        pass/}' \
  tests/test_distill.py::test_a_teacher_is_frozen_in_eval_mode_with_its_batchnorm_folded_when_built
