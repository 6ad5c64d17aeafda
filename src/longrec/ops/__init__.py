"""The native (C++) ops and their reference (PyTorch) twins, chosen by one switch.

`dispatch.use_native(op, *tensors)` decides, under the process-wide setting `auto` |
`reference` | `native` (`train.kernels`, `longrec serve --kernels`, `longrec eval --kernels`;
`dispatch.using` for a block). The C++ sources live in nn/csrc and are built on first use by
nn/row_kernels.py (one extension, `longrec_row_kernels`); this package only chooses.

| op | native (C++ in nn/csrc) | reference (PyTorch) |
|---|---|---|
| gather_dot, gather_pool | nn.row_kernels.gather_dot / gather_pool (row_kernels.cpp), via models.towers.HistoryField.dot / weighted_sum | rows[index] then matmul |
| search_attend (forward and backward) | nn.search_attention.search_attend (search_attention.cpp, search_attention_backward.cpp) | nn.search_attention.search_attend_reference: scores, nn.search.topk_search, nn.attention.masked_softmax, pooling |
| table_rows (the search reads the tables at the batch's ids) | nn.embedding.table_rows | a copy of the batch's distinct rows (nn.embedding.rows_and_picks) |
| prelu_backward | nn.prelu._OneWeightPReLU (prelu.cpp) | nn.PReLU's autograd |
| dedup_ids, dedup_parts | nn.row_kernels.dedup_ids / dedup_parts (row_kernels.cpp), via models.towers.dedup | a bitmap over the id range in PyTorch |
| lookup_rows | nn.row_kernels.lookup_rows, via nn.embedding lookups of over 4,096 ids | index_select |
| scatter_distinct_rows | nn.row_kernels.scatter_distinct_rows, the distinct-id lookups' backward | zeros + index_add_ |
| gather_ranges | nn.row_kernels.gather_ranges, via data.loader.ranges_taker | an index gather or a masked scatter |
| rowwise_adam_, sparse_grad_adam_ | nn.row_kernels.adam_rows_ (adam_rows.cpp), via train.rowwise_adam.RowwiseAdam and train.table_adam.TableAdam | index_select / index_add_ updates; torch.optim.Adam on the densified gradient |
| rowwise_adagrad_ | nn.row_kernels.rowwise_adagrad_ (adam_rows.cpp), via train.rowwise_adagrad.RowwiseAdagrad | index_select / index_add_ updates |
"""

from longrec.ops.dispatch import (
    KERNELS,
    check_kernels,
    for_run,
    kernels,
    set_kernels,
    use_native,
    using,
)

__all__ = ["KERNELS", "check_kernels", "for_run", "kernels", "set_kernels", "use_native", "using"]
