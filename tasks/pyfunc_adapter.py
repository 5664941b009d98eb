"""The MLflow model of a round's adapter (MLflow's models-from-code: this file is copied into
each logged model and run by `mlflow.pyfunc.load_model`).

It answers prompts: the base model named by the model config's `source` (resolved on the loading
machine as every party resolves it, offline) with the round's LoRA adapter on top, each prompt
rendered by the tokenizer's chat template and answered greedily. The base weights are not copied
into every version; the adapter is."""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class AdapterModel(PythonModel):
    def load_context(self, context) -> None:
        from peft import PeftModel

        from fedlib.model.base import load_base_model, load_tokenizer

        source = context.model_config["source"]
        self.tokenizer = load_tokenizer(source)
        self.model = PeftModel.from_pretrained(load_base_model(source), context.artifacts["adapter"]).eval()
        self.model.config.use_cache = True

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        prompts = [str(p) for p in model_input.iloc[:, 0]] if hasattr(model_input, "iloc") else [str(p) for p in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens", 48))
        answers = []
        for prompt in prompts:
            if self.tokenizer.chat_template:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            else:
                text = prompt
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            answers.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
        return answers


mlflow.models.set_model(AdapterModel())
