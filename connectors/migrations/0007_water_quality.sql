-- 0007: the water-quality compliance share per node and day: of the node's readings that carry
-- a water-quality value with a limit (network file `limits`, defaults from the EU Drinking
-- Water Directive), the share with every such value within its limits. NULL for nodes without.
ALTER TABLE water.kpi_daily
    ADD COLUMN IF NOT EXISTS water_quality_compliance double precision;
