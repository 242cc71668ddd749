"""Worker for the 2-process distillation test (run by torch.distributed.run, not collected by pytest)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tsm_core.train.accel import make_accelerator
from tsm_core.train.fsdp import full, is_sharded
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer, rollout
from tsm_distill import trainer as trainer_module
from tsm_distill.critic import Critic
from tsm_distill.data import PromptSource

if __name__ == "__main__":
    torch.set_num_threads(1)
    recipe_path, run_dir = sys.argv[1], Path(sys.argv[2])
    recipe = load_recipe(json.loads(Path(recipe_path).read_text()), DistillRecipe)
    acc = make_accelerator(cpu=True, seed=recipe.train.seed)
    seen = []
    draws = {"rollout_noise": [], "renoise": [], "predict_t": [], "discriminate_t": [], "prompts": []}
    original = PromptSource.sample

    def sample_prompts(self, n, g):
        prompts = original(self, n, g)
        seen.extend(prompts)
        draws["prompts"].append(prompts)
        return prompts

    PromptSource.sample = sample_prompts
    simulate = trainer_module.backward_simulation

    def record_simulation(predict_x0, noise, *a, **kw):
        draws["rollout_noise"].append(noise.clone())
        return simulate(predict_x0, noise, *a, **kw)

    trainer_module.backward_simulation = record_simulation
    renoise = rollout.renoise

    def record_renoise(x0, t, schedule, generator=None):
        out = renoise(x0, t, schedule, generator)
        draws["renoise"].append(out - schedule.add_noise(x0, torch.zeros_like(x0), torch.full((len(x0),), t)))
        return out

    rollout.renoise = record_renoise
    predict, discriminate = Critic.predict, Critic.discriminate
    Critic.predict = lambda self, x, t, c: draws["predict_t"].append(t.clone()) or predict(self, x, t, c)
    Critic.discriminate = lambda self, x, t, c: draws["discriminate_t"].append(t.clone()) or discriminate(self, x, t, c)
    trainer = DMD2Trainer(recipe, run_dir, accelerator=acc)
    out = run_dir.parent
    rank = acc.process_index
    # Which modules FSDP sharded: their weights are DTensors (the experts on the base never are).
    experts = {id(p) for p in trainer.tsm.adapter_parameters()}
    sharded = {"critic": all(is_sharded(p) for p in trainer.critic.fake.parameters()),
               "generator_base": all(is_sharded(p) for p in trainer.teacher.denoiser.parameters() if id(p) not in experts),
               "experts": any(is_sharded(p) for p in trainer.tsm.adapter_parameters()),
               "text_encoders": all(is_sharded(p) for te in trainer.teacher.text_encoders for p in te.parameters())}
    (out / f"sharded{rank}.json").write_text(json.dumps(sharded))
    # The critic before training, so a test can compare what training changed (collective under FSDP).
    save_file({k: full(v.detach()).contiguous() for k, v in trainer.critic.trainable_state().items()},
              out / f"critic_init{rank}.safetensors")
    trainer.train()
    if len(sys.argv) > 3 and sys.argv[3] == "resume-last":
        # Forget the last step: its checkpoint and the final adapter; a new trainer resumes from the one
        # before and must redo that step exactly (module, optimizer and RNG states restored).
        acc.wait_for_everyone()
        if acc.is_main_process:
            import shutil

            shutil.rmtree(trainer.ckpt.latest())
            shutil.rmtree(run_dir / "adapter")
        acc.wait_for_everyone()
        trainer = DMD2Trainer(recipe, run_dir, accelerator=acc)
        trainer.train(resume=True)
    save_file({k: v.contiguous() for k, v in trainer.tsm.state_dict().items()}, out / f"rank{rank}.safetensors")
    # full(): a sharded (FSDP) critic's tensors whole; every process calls it, in the same order
    save_file({k: full(v.detach()).contiguous() for k, v in trainer.critic.trainable_state().items()},
              out / f"critic{rank}.safetensors")
    (out / f"prompts{rank}.json").write_text(json.dumps(seen))
    torch.save(draws, out / f"draws{rank}.pt")
