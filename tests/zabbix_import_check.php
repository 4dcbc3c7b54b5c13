<?php
/*
 * Zabbix 6.0's own frontend code on a template file, without a server or a database: the import's
 * reader, its strict XML validator, its converters, normaliser and data adapter (what
 * CConfiguration::import runs before it writes anything), then the checks of the API services
 * that need no database: UUIDv4s, item keys, history and trend periods, update intervals,
 * trigger expressions (parsed and validated as CTrigger/CTriggerPrototype do, their items looked
 * up in the file), dependencies, value maps, master items, graph items and LLD macros.
 *
 * Usage: php zabbix_import_check.php FILE [FRONTEND_DIR]  ->  JSON {"ok": bool, "errors": [...], "counts": {...}}
 * Used by tests/test_zabbix_template.py; the frontend is Debian's zabbix-frontend-php (/usr/share/zabbix).
 */
$root = $argv[2] ?? '/usr/share/zabbix';
require $root.'/include/defines.inc.php';
require $root.'/include/func.inc.php';
require $root.'/include/gettextwrapper.inc.php';
require $root.'/include/validate.inc.php';
require $root.'/include/items.inc.php';
require $root.'/include/classes/core/CAutoloader.php';
$dirs = [$root.'/include/classes'];
$it = new RecursiveIteratorIterator(new RecursiveDirectoryIterator($root.'/include/classes', FilesystemIterator::SKIP_DOTS),
	RecursiveIteratorIterator::SELF_FIRST);
foreach ($it as $f) {
	if ($f->isDir()) {
		$dirs[] = $f->getPathname();
	}
}
$autoloader = new CAutoloader;
$autoloader->addNamespace('', $dirs);
$autoloader->register();

$errors = [];
$counts = ['items' => 0, 'item_prototypes' => 0, 'triggers' => 0, 'trigger_prototypes' => 0, 'discovery_rules' => 0,
	'graphs' => 0, 'graph_prototypes' => 0, 'valuemaps' => 0, 'uuids' => 0];

function fail(string $where, string $what): void {
	global $errors;
	$errors[] = $where.': '.$what;
}

function check_uuid(string $where, $uuid): void {
	global $counts;
	$counts['uuids']++;
	$error = '';
	if (!CApiInputValidator::validate(['type' => API_UUID], $uuid, $where.'/uuid', $error)) {
		fail($where, $error);
	}
}

try {
	$source = file_get_contents($argv[1]);
	$data = (new CXmlImportReader())->read($source);
	$factory = new CImportValidatorFactory('xml');
	$data = (new CXmlValidator($factory, 'xml'))->setStrict(true)->validate($data, '/');
	if ($data['zabbix_export']['version'] !== '6.0') {
		fail('/zabbix_export/version', 'not 6.0');
	}
	$schema = $factory->getObject(ZABBIX_EXPORT_VERSION)->getSchema();
	$data = (new CConstantImportConverter($schema))->convert($data);
	$data = (new CDefaultImportConverter($schema))->convert($data);
	$data = (new CImportDataNormalizer($schema))->normalize($data);
	$adapter = new CImportDataAdapter();
	$adapter->load($data);
}
catch (Throwable $e) {
	echo json_encode(['ok' => false, 'errors' => ['import: '.$e->getMessage()], 'counts' => $counts]), "\n";
	exit(1);
}

$hist_types = (new CHistFunctionData())->getValueTypes();
$interval_parser = new CUpdateIntervalParser(['usermacros' => true, 'lldmacros' => true]);
$lld_parser = new CLLDMacroParser();

foreach ($adapter->getGroups() as $group) {
	check_uuid('group '.$group['name'], $group['uuid']);
}

$templates = [];
foreach ($adapter->getTemplates() as $template) {
	$templates[$template['host']] = $template;
	check_uuid('template '.$template['host'], $template['uuid']);
	foreach ($template['valuemaps'] as $vm) {
		$counts['valuemaps']++;
		check_uuid('valuemap '.$vm['name'], $vm['uuid']);
	}
}
$all_items = $adapter->getItems();
$all_rules = $adapter->getDiscoveryRules();
$all_triggers = $adapter->getTriggers();

function check_item(string $where, string $key, array $item, array $valuemaps, array $masters,
		bool $prototype): void {
	global $interval_parser;
	check_uuid($where, $item['uuid']);
	if ((new CItemKey())->parse($key) != CParser::PARSE_SUCCESS) {
		fail($where, 'item key does not parse');
	}
	$error = '';
	if (array_key_exists('history', $item)
			&& !validateTimeUnit($item['history'], SEC_PER_HOUR, 25 * SEC_PER_YEAR, true, $error,
				['usermacros' => true, 'lldmacros' => $prototype])) {
		fail($where, 'history: '.$error);
	}
	if (array_key_exists('trends', $item)
			&& !validateTimeUnit($item['trends'], SEC_PER_DAY, 25 * SEC_PER_YEAR, true, $error,
				['usermacros' => true, 'lldmacros' => $prototype])) {
		fail($where, 'trends: '.$error);
	}
	$textual = in_array($item['value_type'], [ITEM_VALUE_TYPE_STR, ITEM_VALUE_TYPE_TEXT, ITEM_VALUE_TYPE_LOG]);
	if ($textual && array_key_exists('trends', $item) && $item['trends'] !== '0') {
		fail($where, 'a text item keeps no trends');
	}
	if ($textual && $item['units'] !== '') {
		fail($where, 'a text item has no units');
	}
	$type = (int) $item['type'];
	if ($type == ITEM_TYPE_DEPENDENT || $type == ITEM_TYPE_TRAPPER) {
		if ($item['delay'] !== '0') {
			fail($where, 'a dependent or trapper item has delay 0');
		}
	}
	elseif ($interval_parser->parse($item['delay']) != CParser::PARSE_SUCCESS) {
		fail($where, 'delay does not parse');
	}
	if ($type == ITEM_TYPE_DEPENDENT) {
		$master = $item['master_item']['key'] ?? '';
		if (!in_array($master, $masters, true)) {
			fail($where, 'master item "'.$master.'" is not an item of the template');
		}
	}
	if ($item['valuemap'] && !in_array($item['valuemap']['name'], $valuemaps, true)) {
		fail($where, 'value map "'.$item['valuemap']['name'].'" is not in the template');
	}
	foreach ($item['preprocessing'] as $i => $step) {
		$step['params'] = implode("\n", $step['parameters']);
		if ($step['params'] === '') {
			fail($where, 'preprocessing step '.($i + 1).' has no parameters');
		}
		if ($step['type'] == ZBX_PREPROC_THROTTLE_TIMED_VALUE
				&& !validateTimeUnit($step['params'], 1, 25 * SEC_PER_DAY, false, $error, ['usermacros' => true])) {
			fail($where, 'heartbeat: '.$error);
		}
		if ($step['error_handler'] == ZBX_PREPROC_FAIL_SET_ERROR && $step['error_handler_params'] === '') {
			fail($where, 'a custom error needs its text');
		}
	}
}

/* $keys: key => value type of the items a trigger may use; $proto_keys: the rule's prototypes. */
function check_trigger(string $where, array $trigger, string $host, array $keys, array $proto_keys,
		bool $prototype): void {
	global $hist_types;
	check_uuid($where, $trigger['uuid']);
	foreach (['expression', 'recovery_expression'] as $field) {
		if ($field === 'recovery_expression' && $trigger['recovery_mode'] != ZBX_RECOVERY_MODE_RECOVERY_EXPRESSION) {
			continue;
		}
		$parser = new CExpressionParser(['usermacros' => true, 'lldmacros' => $prototype]);
		if ($parser->parse($trigger[$field]) != CParser::PARSE_SUCCESS) {
			fail($where, $field.': '.$parser->getError());
			continue;
		}
		$validator = new CExpressionValidator(['usermacros' => true, 'lldmacros' => $prototype]);
		if (!$validator->validate($parser->getResult()->getTokens())) {
			fail($where, $field.': '.$validator->getError());
		}
		$uses_prototype = false;
		foreach ($parser->getResult()->getTokensOfTypes([CExpressionParserResult::TOKEN_TYPE_HIST_FUNCTION]) as $fn) {
			$query = $fn['data']['parameters'][0]['data'];
			if ($query['host'] !== $host) {
				fail($where, 'refers to host "'.$query['host'].'", not its template');
				continue;
			}
			$all = $keys + $proto_keys;
			if (!array_key_exists($query['item'], $all)) {
				fail($where, 'item key "'.$query['item'].'" is not in the template');
				continue;
			}
			$uses_prototype = $uses_prototype || array_key_exists($query['item'], $proto_keys);
			if (!in_array($all[$query['item']], $hist_types[$fn['data']['function']])) {
				fail($where, 'function '.$fn['data']['function'].' does not take the value type of '.$query['item']);
			}
		}
		if ($prototype && $field === 'expression' && !$uses_prototype) {
			fail($where, 'a trigger prototype must use an item prototype');
		}
	}
}

function check_dependencies(string $where, array $trigger, array $known): void {
	foreach ($trigger['dependencies'] as $dep) {
		$found = false;
		foreach ($known as $t) {
			if ($t['description'] === $dep['name'] && $t['expression'] === $dep['expression']) {
				$found = true;
			}
		}
		if (!$found) {
			fail($where, 'depends on "'.$dep['name'].'", which is not a trigger of its template (or rule)');
		}
	}
}

foreach ($templates as $host => $template) {
	$valuemaps = array_column($template['valuemaps'], 'name');
	$items = $all_items[$host] ?? [];
	$keys = [];
	foreach ($items as $key => $item) {
		$keys[$key] = $item['value_type'];
	}
	foreach ($items as $key => $item) {
		$counts['items']++;
		check_item("$host item $key", (string) $key, $item, $valuemaps, array_keys($keys), false);
	}
	$host_triggers = [];
	foreach ($all_triggers as $trigger) {
		$parser = new CExpressionParser(['usermacros' => true]);
		if ($parser->parse($trigger['expression']) == CParser::PARSE_SUCCESS
				&& in_array($host, $parser->getResult()->getHosts(), true)) {
			$host_triggers[] = $trigger;
		}
	}
	foreach ($host_triggers as $trigger) {
		$counts['triggers']++;
		check_trigger("$host trigger ".$trigger['description'], $trigger, $host, $keys, [], false);
		check_dependencies("$host trigger ".$trigger['description'], $trigger, $host_triggers);
	}
	foreach ($all_rules[$host] ?? [] as $rkey => $rule) {
		$counts['discovery_rules']++;
		$where = "$host discovery rule $rkey";
		check_uuid($where, $rule['uuid']);
		if ((int) $rule['type'] == ITEM_TYPE_DEPENDENT && !array_key_exists($rule['master_item']['key'], $keys)) {
			fail($where, 'master item is not an item of the template');
		}
		foreach ($rule['lld_macro_paths'] as $path) {
			if ($lld_parser->parse($path['lld_macro']) != CParser::PARSE_SUCCESS || $path['path'] === '') {
				fail($where, 'bad LLD macro path '.$path['lld_macro']);
			}
		}
		$proto_keys = [];
		foreach ($rule['item_prototypes'] as $proto) {
			$proto_keys[$proto['key_']] = $proto['value_type'];
		}
		foreach ($rule['item_prototypes'] as $proto) {
			$pkey = $proto['key_'];
			$counts['item_prototypes']++;
			check_item("$where item prototype $pkey", $pkey, $proto, $valuemaps, array_keys($keys), true);
			if (strpos($pkey, '{#') === false) {
				fail("$where item prototype $pkey", 'an item prototype key must contain an LLD macro');
			}
		}
		$known = array_merge($rule['trigger_prototypes'], $host_triggers);
		foreach ($rule['trigger_prototypes'] as $trigger) {
			$counts['trigger_prototypes']++;
			check_trigger("$where trigger prototype ".$trigger['description'], $trigger, $host, $keys, $proto_keys, true);
			check_dependencies("$where trigger prototype ".$trigger['description'], $trigger, $known);
		}
		foreach ($rule['graph_prototypes'] as $graph) {
			$counts['graph_prototypes']++;
			check_uuid("$where graph prototype ".$graph['name'], $graph['uuid']);
			$has_proto = false;
			foreach ($graph['gitems'] as $gitem) {
				if ($gitem['item']['host'] !== $host
						|| !array_key_exists($gitem['item']['key'], $keys + $proto_keys)) {
					fail("$where graph prototype ".$graph['name'], 'graph item '.$gitem['item']['key'].' is not in the template');
				}
				$has_proto = $has_proto || array_key_exists($gitem['item']['key'], $proto_keys);
			}
			if (!$has_proto) {
				fail("$where graph prototype ".$graph['name'], 'a graph prototype must show an item prototype');
			}
		}
	}
}
foreach ($adapter->getGraphs() as $graph) {
	$counts['graphs']++;
	check_uuid('graph '.$graph['name'], $graph['uuid']);
	foreach ($graph['gitems'] as $gitem) {
		$host = $gitem['item']['host'];
		if (!array_key_exists($host, $templates) || !array_key_exists($gitem['item']['key'], $all_items[$host] ?? [])) {
			fail('graph '.$graph['name'], 'graph item '.$host.':'.$gitem['item']['key'].' is not an item of a template');
		}
	}
}

echo json_encode(['ok' => !$errors, 'errors' => $errors, 'counts' => $counts]), "\n";
exit($errors ? 1 : 0);
