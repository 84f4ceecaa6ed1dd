"""The numbers behind the walkthroughs and the reports, computed from a model's own tensors (its ``forward_parts``,
see ``onestage.modeling.parts``); ``onestage.viz`` draws them.

* ``fcos_assignment`` — FCOS's assignment statistics (best possible recall, ambiguous samples; FCOS §3.2, Table 1/2)
* ``centerness`` — candidates before NMS, center-ness re-ranking, Spearman, NMS effect (FCOS §3.3)
* ``condinst`` — one instance through its dynamic head, look-alike pairs, inference-time probes, Table 1's timing
* ``solo_diagnostics`` — which branch limits a SOLO / SOLOv2 model (category vs mask at the positive cells)
* ``errors`` — COCO error attribution (TIDE-style)
"""
