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




def example(device="cpu") -> dict:
    """The mask with DOC_ID on `device`: captured tensors live where q, k, v live (moved once, not per call)."""
    doc_id = DOC_ID.to(device)

    @fc.mask_mod
    def same_document(b, h, q_idx, kv_idx):
        return doc_id[q_idx] == doc_id[kv_idx]

    return {"mask_mod": fc.and_masks(causal, same_document), "q_len": len(DOC_ID), "heads": 2}


EXAMPLE = example()  # on the CPU
document_causal = EXAMPLE["mask_mod"]

if __name__ == "__main__":
    from _run import run_example

    run_example(example)
