#!/usr/bin/env bash
# GRPO with Adaptive Entropy Regularization on verl 0.9.1: Qwen3 on GSM8K, vLLM rollouts,
# verl's v1 trainer (sync mode, the default). It is verl's own command line, launched through
# entropy_reg's module instead of verl.trainer.main_ppo, plus the +aer.* settings.
#
#   pip install 'entropy-reg[verl]' vllm         # the GPU machine's vLLM build for its torch
#   python verl/examples/data_preprocess/gsm8k.py --local_save_dir ~/data/gsm8k   # verl's script
#   MODEL=Qwen/Qwen3-1.7B NGPUS=8 bash examples/verl_qwen3_grpo_aer.sh [more verl overrides]
#
# Legacy trainer: add trainer.use_v1=False. AER settings are the fields of entropy_reg.AERConfig.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen3-1.7B}
DATA=${DATA:-$HOME/data/gsm8k}
NGPUS=${NGPUS:-8}

python -m entropy_reg.integrations.verl \
    algorithm.adv_estimator=grpo \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=256 \
    data.max_prompt_length=512 \
    data.max_response_length=2048 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.calculate_entropy=True \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.nnodes=1 \
    trainer.logger='[console]' \
    trainer.project_name=aer \
    trainer.experiment_name=qwen3-grpo-aer \
    trainer.save_freq=20 \
    trainer.test_freq=10 \
    trainer.total_epochs=1 \
    +aer.target_ratio=0.5 \
    +aer.coef_max=0.005 \
    "$@"
