"""Document masking for packed sequences: causal attention that never crosses a document boundary.

Paper: "Efficient Sequence Packing without Cross-contamination: Accelerating Large Language Models
without Impacting Performance" (2021); the FlexAttention paper ("Flex Attention: A Programming Model for
Generating Optimized Attention Kernels", 2024) uses it as its running example.  DOC_ID[i] is the document
of packed token i, a captured tensor built once from the documents' lengths.
"""

import torch
from causal import causal

import flexcomp as fc

DOC_LENGTHS = [100, 37, 300, 211, 64, 312]  # packed into one sequence of 1024 tokens
DOC_ID = torch.repeat_interleave(torch.arange(len(DOC_LENGTHS)), torch.tensor(DOC_LENGTHS)).to(torch.int32)


@fc.mask_mod
def same_document(b, h, q_idx, kv_idx):
    return DOC_ID[q_idx] == DOC_ID[kv_idx]


document_causal = fc.and_masks(causal, same_document)

EXAMPLE = {"mask_mod": document_causal, "q_len": len(DOC_ID), "heads": 2}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
