"""Dotted config keys and class paths shared by the tune-space tests (not a test module: no ``test_`` prefix)."""

BAL = "model.init_args.balancer.class_path"
ALPHA = "model.init_args.balancer.init_args.alpha"
WEIGHT = "model.init_args.tasks.like.weight"
MIN_W = "model.init_args.balancer.init_args.min_weight"
LR = "model.init_args.optimizer.init_args.lr"
EXPERTS = "model.init_args.model.init_args.num_experts"
DROPOUT = "model.init_args.model.init_args.dropout"
HIDDEN = "model.init_args.model.init_args.expert_hidden"
STATIC, GRADNORM, DWA = "rec_dist.balancing.StaticWeights", "rec_dist.balancing.GradNorm", "rec_dist.balancing.DWA"
LHUC = "model.init_args.model.init_args.personalization.lhuc"
LHUC_F = "model.init_args.model.init_args.personalization.lhuc.features"
LHUC_ON = {"features": ["user_id", "age"]}  # a mapping-valued choice: its settings are written into it
