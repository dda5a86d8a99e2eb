-- prebuilds: spread concurrent claims over the pool.
--
-- Concurrent claims of one preset used to scan the pool in the same order, so each walked past
-- (and fully evaluated) every prebuild the others had just locked. A claim now starts at a random
-- workspace id and walks up (wrapping round), which needs the live-prebuild index ordered by id
-- within a template. The new index serves everything the old one did (template_id leads).
DROP INDEX workspaces_prebuild_pool;
CREATE INDEX workspaces_prebuild_pool ON workspaces (template_id, id)
    WHERE owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' AND NOT deleted;
