# Sourced by the sbatch templates in this folder: environment set-up and the launch wrapper.
# Edit the "site" block for your cluster; the rest is generic.

# ---- site: modules or a virtual environment (placeholders) -------------------------------
# module load python/3.11 cuda/12.4 nccl          # <- your cluster's modules
DS_SIMCLR_VENV=${DS_SIMCLR_VENV:-$SLURM_SUBMIT_DIR/.venv}
if [[ -f $DS_SIMCLR_VENV/bin/activate ]]; then source "$DS_SIMCLR_VENV/bin/activate"; fi

# ---- node-local scratch: compiled ops, caches, temporary files ---------------------------
SCRATCH=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/ds_simclr-$SLURM_JOB_ID
mkdir -p "$SCRATCH"
export TMPDIR=$SCRATCH
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SCRATCH/torch_extensions}
export PYTHONUNBUFFERED=1

# launch_and_requeue ARGS...: run `ds_simclr launch ARGS`, forward USR1/TERM to it (it asks
# every rank to checkpoint and stop), and requeue the job when it stopped early (exit 75).
launch_and_requeue() {
  echo "batch: $(date +%T) on $(hostname): ds_simclr launch $*"
  ds_simclr launch "$@" &
  local pid=$!
  trap "echo \"batch: \$(date +%T) stop signal: forwarding to launch\"; kill -USR1 $pid 2>/dev/null" USR1 TERM
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
  wait "$pid"; local rc=$?
  trap - USR1 TERM
  if [[ $rc == 75 ]]; then
    echo "batch: $(date +%T) stopped with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
