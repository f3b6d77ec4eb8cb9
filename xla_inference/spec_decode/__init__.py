"""Speculative decoding's drafters on the device: a draft model's greedy proposals on its
own engine (draft_model.py, DraftProposer) and an EAGLE head's (EAGLE-1, EAGLE-3, MTP) from
the target's hidden states (eagle.py, EagleProposer). Both run on runner/'s engine, so the
package sits above runner/; the verify step the engine itself runs stays below it
(runner/speculative.py, sampling/rejection.py, sampling/draft_host.py). Which methods vLLM
may ask for, their refusals and the n-gram drafter are the adapter's
(plugin/spec_decode.py). Imports no vllm or torch."""
