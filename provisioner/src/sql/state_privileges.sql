-- Whether this role may use the states table of schema $1 (and its id sequence) as terraform does.
SELECT has_table_privilege($1 || '.states', 'SELECT, INSERT, UPDATE, DELETE'),
       coalesce(has_sequence_privilege(
           pg_get_serial_sequence($1 || '.states', 'id'), 'USAGE'), false)
